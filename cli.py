"""``python cli.py fit|validate|test|predict|merge --config configs/....yaml``"""

from freemerge_pl.cli import main

if __name__ == "__main__":
    main()
