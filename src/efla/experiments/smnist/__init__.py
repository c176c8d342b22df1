"""Sequential-MNIST robustness study (the paper's first experiment): EFLA vs DeltaNet, one layer, d = 64.

``model`` holds the classifier, ``corruptions`` the test-time corruptions, ``train`` the study (``run_study``),
``report`` the table and plots, ``cli`` the ``efla smnist`` command.
"""
