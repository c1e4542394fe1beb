"""``python -m dfa_kernels ...`` is the ``dfa-kernels`` command; torchrun starts distributed
workers this way: ``torchrun --nproc-per-node 8 -m dfa_kernels train TASK ...``."""

from .cli import main

if __name__ == "__main__":
    main()
