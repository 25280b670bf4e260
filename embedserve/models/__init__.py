"""Model files on disk: the models directory, import, and the build-venv export scripts."""
