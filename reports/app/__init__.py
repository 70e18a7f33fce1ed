"""The refusal explorer (seed Phase 6): a Streamlit app to probe the refusal circuit live.

``explorer.py`` is the Streamlit script (launch it with ``./suite explore``); ``probe.py``
holds the model computations, ``rundata.py`` reads a run directory (reports/SCHEMA.md),
``charts.py`` builds the figures and ``views.py`` lays out each view.
"""
