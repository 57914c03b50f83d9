"""Stages 1-2, the front end: capture the model as a graph (:mod:`.capture`), declare its user
and item inputs as flat placeholders (:mod:`.inputs`), and make it functional (:mod:`.functionalize`)."""
