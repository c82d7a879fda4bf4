"""cwhawq: channel-wise mixed-precision quantization (CW-HAWQ), from Hessian sensitivity to compiled artifacts."""
__version__ = "0.1.0"
