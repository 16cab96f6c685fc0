"""Kept for models logged before imgcls.inference existed: their script imports this name.

A serving model logged to MLflow is "models from code": a two-line script that MLflow runs to
build it, `from imgcls.serving import ImgclsServingModel` in every model logged before the
inference package. Registered versions live for years, so this path keeps loading them; new
code imports :mod:`imgcls.inference.serving`. `python -m imgcls.serving URI FOLDER` (documented
in older docs) still works too.
"""

from imgcls.inference.serving import ImgclsServingModel, main

__all__ = ["ImgclsServingModel"]

if __name__ == "__main__":
    main()
