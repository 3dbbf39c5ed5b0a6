"""Figure builders for the notebooks: pure functions from data to a matplotlib figure (or an update of one).

One module per notebook topic. Every function returns the figure (and, where a widget redraws it, the
artists it updates), so tests can check the data behind each figure.
"""
