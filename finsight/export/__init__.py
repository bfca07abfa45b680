"""What a trained run leaves for others to use: the adapter folder, a merged model, a GGUF file."""
