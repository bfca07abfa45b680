"""The commands: ``fit``/``validate``/``test``/``predict`` through the Lightning CLI, ``chat`` and ``export``."""
