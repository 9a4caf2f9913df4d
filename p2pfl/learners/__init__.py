"""Synchronous learning code (torch), no networking: Learner protocol, TorchLearner, data sets."""
