"""Entry point for ``streamlit run dashboard/app.py -- --root RESULTS``.

The app lives in the package (tally/dashboard_app) so an installed ``tally dashboard`` finds it;
this file keeps the path the architecture documents working from a checkout.
"""

from tally.dashboard_app.app import main

main()
