"""MSN's few-shot classifier fitted by cyanure itself, run by tests/test_fewshot.py (not a test itself).

``SIMDINO_CYANURE_PYTHON tests/cyanure_driver.py IN.npz OUT.npz``: IN holds x, y, tx, lambd, tol, max_iter; OUT gets
the preprocessed features ``xp``, the weights ``w`` (d, k) and the test predictions ``pred``. The calls are MSN's
logistic_eval.py in cyanure's 1.x API (``cyan.preprocess`` / ``cyan.MultiClassifier(...).fit(lambd=lambd / n)``
before 1.0; the same C++ solvers):

    cyan.preprocess(embs, normalize=normalize, columns=False, centering=True)
    classifier = cyan.MultiClassifier(loss='multiclass-logistic', penalty=penalty, fit_intercept=False)
    lambd /= len(embs)
    classifier.fit(embs.numpy(), labs.numpy(), it0=10, lambd=lambd, lambd2=lambd, nthreads=-1, tol=1e-3,
                   solver='auto', seed=0, max_epochs=300)
"""

import sys

import numpy as np
from cyanure.data_processing import preprocess
from cyanure.estimators import Classifier


def main(src: str, dst: str) -> None:
  d = np.load(src)
  x, tx = np.array(d["x"], np.float64), np.array(d["tx"], np.float64)
  lambd = float(d["lambd"]) / len(x)
  preprocess(x, normalize=True, columns=False, centering=True)  # in place, as MSN
  preprocess(tx, normalize=True, columns=False, centering=True)
  clf = Classifier(
    loss="multiclass-logistic",
    penalty="l2",
    fit_intercept=False,
    lambda_1=lambd,
    lambda_2=lambd,
    tol=float(d["tol"]),
    solver="auto",
    random_state=0,
    max_iter=int(d["max_iter"]),
    duality_gap_interval=10,
    verbose=False,
  )
  clf.fit(x, d["y"].astype(np.int64))
  np.savez(dst, xp=x, w=np.asarray(clf.coef_), pred=np.asarray(clf.predict(tx)))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
