"""lenslab.app: the Streamlit workbench (thin pages over the library)."""
