"""Integrations of oscar with other frameworks, one module each (imported on demand).

* :mod:`oscar.integrations.transformers`: ``OScaRCache`` and the ``"oscar"`` attention
  implementation for Hugging Face transformers 5.x (``pip install 'oscar-kv[transformers]'``).

The core package never imports these modules: ``import oscar`` works without the frameworks.
"""
