"""Release and CI tooling for slime: `python -m release --help`. Not part of the installed package."""
