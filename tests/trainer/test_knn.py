import torch

from trainer.knn import correct_at, weighted_knn_scores


def test_weighted_votes_sum_exp_similarity_per_class():
    sims = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.4, 0.3]])
    labels = torch.tensor([[1, 0, 0], [2, 2, 1]])
    scores = weighted_knn_scores(sims, labels, num_classes=3, sigma=0.1)
    e = torch.exp(sims / 0.1)
    torch.testing.assert_close(scores[0], torch.stack([e[0, 1] + e[0, 2], e[0, 0], torch.tensor(0.0)]))
    torch.testing.assert_close(scores[1], torch.stack([torch.tensor(0.0), e[1, 2], e[1, 0] + e[1, 1]]))


def test_one_close_neighbour_can_outvote_several_far_ones():
    sims = torch.tensor([[0.99, 0.5, 0.5, 0.5]])
    scores = weighted_knn_scores(sims, torch.tensor([[3, 1, 1, 1]]), 4, sigma=0.07)
    assert scores.argmax() == 3


def test_correct_at_k():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    assert correct_at(scores, torch.tensor([2, 0, 0]), (1, 2)) == [1, 2]
