"""The debug API (``extproc.debug.v1.RouterDebug``): its generated modules and its servicer."""
