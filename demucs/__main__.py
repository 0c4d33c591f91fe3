"""`python -m demucs TRACK ...` runs the `demucs` separation command."""
from .separate import main

if __name__ == "__main__":
    main()
