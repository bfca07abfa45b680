"""A table built once and rendered twice: Rich for the terminal, Markdown for result files and TensorBoard.

The data report and ``finsight test``'s results are each shown in both places; building the cells once keeps
the two renderings from drifting apart (a column only one of them shows, a number formatted two ways).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table


@dataclass
class TextTable:
    """Header, rows of already formatted cells, and what goes under them."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    text_columns: tuple[int, ...] = (0,)
    """Columns that hold names or text (left-aligned); the others hold numbers (right-aligned)."""
    caption: str = ""
    total_row: bool = False
    """Whether the last row is a total (bold in the terminal)."""

    def rich(self) -> Table:
        """The terminal rendering."""
        from rich.table import Table

        table = Table(title=self.title)
        for index, column in enumerate(self.columns):
            table.add_column(column, justify="left" if index in self.text_columns else "right")
        for index, row in enumerate(self.rows):
            last = index == len(self.rows) - 1
            table.add_row(*row, style="bold" if self.total_row and last else None)
        if self.caption:
            table.caption = self.caption
        return table

    def markdown(self) -> str:
        """The Markdown rendering, ending with a newline (the caption, if any, as a paragraph under it)."""
        align = ["---" if index in self.text_columns else "---:" for index in range(len(self.columns))]
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows]
        if self.caption:
            lines += ["", self.caption]
        return "\n".join(lines) + "\n"
