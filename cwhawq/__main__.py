"""``python -m cwhawq`` (and ``torchrun -m cwhawq``, docs/scale-out.md): the command line of :mod:`cwhawq.cli`."""
from .cli import main

if __name__ == "__main__":
    main()
