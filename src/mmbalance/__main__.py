"""`python -m mmbalance [overrides]` trains; imports stay light so Hydra starts fast (torch loads in main)."""

from mmbalance.cli import console_main

if __name__ == "__main__":
    console_main()
