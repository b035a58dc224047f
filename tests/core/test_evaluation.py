import numpy as np

from dalle_core import shapes
from dalle_core.evaluation import faithfulness, has_pair, rerank_gain
from dalle_core.generate import ranks


def test_rerank_gain_is_best_of_first_n():
    scores = np.array([[0.1, 0.5, 0.2, 0.3], [0.4, 0.1, 0.6, 0.0]])
    g = rerank_gain(scores, ns=(1, 2, 4))
    assert g["clip_random"] == g["clip_top1_of_1"] == 0.25
    assert g["clip_top1_of_2"] == (0.5 + 0.4) / 2 and g["clip_top1_of_4"] == (0.5 + 0.6) / 2


def test_ranks_follow_scores():
    assert ranks(np.array([0.2, 0.9, 0.5, 0.9])).tolist() == [3, 0, 2, 1]


def test_faithfulness_of_real_and_shuffled_images():
    rows = list(shapes.generate(200, 32, seed=9))
    images, captions = [r[3] for r in rows], [r[2] for r in rows]
    real = faithfulness(images, captions)
    assert real["overall.all"] == 1.0 and real["single.all"] == 1.0 and real["pair.all"] == 1.0
    shuffled = faithfulness(images, captions[1:] + captions[:1])
    assert shuffled["overall.all"] < 0.1 and shuffled["overall.colour"] < 0.5
    assert has_pair("a purple triangle above a red circle", ["purple triangle"])
    assert not has_pair("a purple circle", ["purple triangle"])
