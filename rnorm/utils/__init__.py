"""Small helpers with no third-party dependencies (PNG writing, image grids)."""

from rnorm.utils.png import encode_png, image_grid, write_png

__all__ = ["encode_png", "image_grid", "write_png"]
