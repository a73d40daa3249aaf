"""`python -m lorafit ...`: the same CLI, for torchrun and accelerate launch."""

from lorafit.cli import main

if __name__ == "__main__":
    main()
