"""Multi-query associative recall (MQAR, the Zoology benchmark): can a 2-layer model recall the value bound to each
key after reading all key-value pairs once? It probes the paper's claim of information fidelity over long sequences.

``data`` generates the task, ``train`` trains and scores one model per setting (``run_sweep``), ``report`` makes the
table and plot, ``cli`` the ``efla mqar`` command.
"""
