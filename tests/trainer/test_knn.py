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


def test_knn_in_chunks_counts_as_the_whole_similarity_matrix_would(monkeypatch):
    from trainer import knn
    from trainer.knn import knn_accuracy, knn_correct, neighbours_correct

    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    test = torch.nn.functional.normalize(torch.randn(11, 8, generator=g), dim=1)
    train_labels, test_labels = torch.randint(0, 6, (40,), generator=g), torch.randint(0, 6, (11,), generator=g)
    sims, idx = (test @ train.T).topk(7, dim=1)
    whole = neighbours_correct(sims, train_labels[idx], test_labels, 6, 0.1)
    monkeypatch.setattr(knn, "CHUNK", 4)  # 11 queries: chunks of 4, 4 and 3
    assert knn_correct(train, train_labels, test, test_labels, 6, 7, 0.1) == whole
    assert knn_accuracy(train, train_labels, test, test_labels, 6, 7, 0.1) == (whole[0] / 11, whole[1] / 11)
    # Its own features as the train set: each query's nearest neighbour is itself.
    assert knn_correct(train, train_labels, train, train_labels, 6, 1, 0.1) == (40, 40)
