"""Entry point for ``streamlit run dashboard/app.py -- --root RESULTS``.

The app lives in the package (tally/dashboard) so an installed ``tally dashboard`` finds it;
this file keeps the path the architecture documents working from a checkout.
"""

from tally.dashboard.app import main

main()
