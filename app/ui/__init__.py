"""Streamlit pages of the review app; app/streamlit_app.py lists them in the navigation."""
