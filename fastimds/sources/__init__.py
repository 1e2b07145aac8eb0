"""Where VM descriptions come from: the data file and the data directory, behind one interface (base.Source).

Admin writes are no source: the admin API calls the writer (fastimds.control.writer) itself.
"""
