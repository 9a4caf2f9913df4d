"""Write scikit-learn's breast-cancer data set as cancer.csv: 569 rows, 30 features, a diagnosis."""

import numpy as np
from sklearn.datasets import load_breast_cancer

data = load_breast_cancer()
np.savetxt("cancer.csv", np.column_stack([data.data, data.target]), delimiter=",", fmt="%g", comments="",
           header=",".join([*(name.replace(" ", "_") for name in data.feature_names), "diagnosis"]))
