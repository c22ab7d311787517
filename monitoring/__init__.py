"""Monitoring: Evidently results -> typed summaries, and the pure degradation
policy (ok / warn / recompress). Built by the monitoring issue (ROADMAP 4);
the data stage already keeps the ``reference`` split and the shifted
product-review domain it will use.
"""
