"""Backdoor detection by trigger reverse engineering (Neural Cleanse) and outlier tests."""

from deepdot.scan.base import PreprocessingMismatch, TriggerScanner, check_clean_accuracy
from deepdot.scan.fast import FastNeuralCleanse
from deepdot.scan.neural_cleanse import NeuralCleanse
from deepdot.scan.outliers import OutlierStats, anomaly_indices, mad, outlier_test
from deepdot.scan.result import LabelTrigger, ScanResult

__all__ = [
    "FastNeuralCleanse",
    "LabelTrigger",
    "NeuralCleanse",
    "OutlierStats",
    "PreprocessingMismatch",
    "ScanResult",
    "TriggerScanner",
    "anomaly_indices",
    "check_clean_accuracy",
    "mad",
    "outlier_test",
]
