"""Accuracy as a local `evaluate` metric module, so `evaluate.load(path)` works offline.

`evaluate.load("accuracy")` fetches the metric script from the Hub and fails without network; this
file is a self-contained module that `evaluate` can load from disk instead:

    import evaluate
    from hf_sam.metrics import metric_path
    accuracy = evaluate.load(metric_path("accuracy"))
    accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])   # {'accuracy': 0.666...}

It computes the same numbers as the Hub's `accuracy` metric: the fraction (or, with
`normalize=False`, the count) of predictions equal to their reference, optionally weighted by
`sample_weight`. `evaluate` copies this file into its modules cache and imports it on its own, so it
imports nothing from hf_sam.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the examples processed:
accuracy = (TP + TN) / (TP + TN + FP + FN), or for multi-class labels the mean of
(prediction == reference) over the examples.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`): if False, return the number of correct predictions instead of the fraction.
        Defaults to True.
    sample_weight (`list` of `float`): per-example weights. Defaults to None (all weights 1).

Returns:
    accuracy (`float` or `int`): a float in [0, 1] when normalize is True, else the (weighted) count.

Examples:
    >>> accuracy = evaluate.load(path_to_this_file)
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 0])
    {'accuracy': 0.75}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
        correct = (predictions == references).astype(np.float64)
        if sample_weight is not None:
            correct = correct * np.asarray(sample_weight, dtype=np.float64)
        total = float(correct.sum())
        if not normalize:
            return {"accuracy": total}
        denominator = float(np.sum(sample_weight)) if sample_weight is not None else float(len(correct))
        return {"accuracy": total / denominator if denominator else 0.0}
