"""DVC stage commands, one module per stage (``python -m stages.<name>``).

One module each so that a stage's DVC deps are exactly the files it imports:
editing the frontier report never re-runs training. tests/test_dvc_graph.py
finds each entry point's imports and checks dvc.yaml lists them all.
"""
