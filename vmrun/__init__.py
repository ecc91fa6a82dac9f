"""vmrun: run a stack of QEMU guests described in one TOML file."""

__version__ = "0.1.0"
