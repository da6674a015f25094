"""A cluster of attested Dask nodes (issue 18): attested comms, worker and scheduler nodes, the head.

Importing :mod:`mesatee_notebook.enclave.cluster.comm` registers the ``atls://`` comm backend with Dask.
Details and what is not built yet: docs/cluster.md.
"""
