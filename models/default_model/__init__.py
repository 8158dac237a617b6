"""The bundled default model (model.onnx + manifest.json), trained on simulator data.

A package only so that setuptools ships its data files; load it with
``SuggestionModel.load(models.serving.DEFAULT_MODEL_DIR)``.
"""
