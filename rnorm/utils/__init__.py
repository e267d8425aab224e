"""Small helpers with no third-party dependencies beyond torch (atomic writes, PNG files, image grids)."""

from rnorm.utils.atomic import atomic_write_bytes
from rnorm.utils.png import encode_png, image_grid, write_png

__all__ = ["atomic_write_bytes", "encode_png", "image_grid", "write_png"]
