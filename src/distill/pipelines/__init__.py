"""The job tier: one module per end-to-end job, over the library beneath it.

``run`` (causal LM, ``distill run`` / ``distill.distill``), ``encoder_run`` (classification and
embedding), ``module_run`` (any ``nn.Module``, ``distill.distill_module``), ``cache``, ``student``,
``generate``, ``eval``, ``compress``, ``export``; and what every causal-LM job starts from:
``run_models`` (teacher and student), ``training_data`` and ``run_teachers`` (``teachers:``).
Only the CLI, the package face and these modules import this package; the library never does
(``tests/test_architecture.py``).
"""
