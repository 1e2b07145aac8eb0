"""The on-disk contract between the processes of one server: every file and folder name, in one place."""
