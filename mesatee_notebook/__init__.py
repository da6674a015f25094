"""mesatee_notebook: confidential data science in Jupyter."""
