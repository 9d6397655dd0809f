"""The dashboard: a data layer over the store (never imports streamlit) and the Streamlit app on top.

Shipped inside the package so ``tally dashboard`` finds it when installed.
``app.py`` is the Streamlit script (``streamlit run``); ``views`` lays out each section, ``charts``
builds the plotly figures and ``cache`` memoises store reads keyed on file mtimes. The data they show
comes from ``tally.dashboard.data``.
"""

from pathlib import Path

APP_PATH = Path(__file__).with_name("app.py")
