"""Asynchronous saves: the save process (parent side), its child, the state pipe."""
