"""The one count parser of the benchmark commands."""

from argparse import ArgumentTypeError

import pytest

from benchmarks.args import comma_list, positive_int


@pytest.mark.parametrize(
    "text, value",
    [("1", 1), ("4096", 4096), (" 256 ", 256), ("1e6", 10**6), ("3e7", 3 * 10**7), ("2.5e3", 2500), ("1E4", 10**4)],
)
def test_counts_are_integers_or_scientific_notation(text, value):
    assert positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "0e0", "-1e6", "1.5", "1e-3", "inf", "nan", "", "ten", "1,2"])
def test_anything_but_a_whole_number_of_at_least_one_is_refused(text):
    with pytest.raises(ArgumentTypeError):
        positive_int(text)


def test_a_list_keeps_each_value_once_in_order_and_must_not_be_empty():
    assert comma_list("1e4, 2,1e4,,3", positive_int) == [10**4, 2, 3]
    with pytest.raises(ArgumentTypeError, match="empty"):
        comma_list(" , ", positive_int)
    with pytest.raises(ArgumentTypeError, match="whole number"):
        comma_list("1,1.5", positive_int)
