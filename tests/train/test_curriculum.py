import itertools

from refrag.train.curriculum import TABLE8, build_curriculum, chunk_types, flat_order


def test_reproduces_table8():
    cur = build_curriculum(256, sum(map(sum, TABLE8)))  # the printed totals are rounded: rows sum to 42,008
    assert cur.types == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    for j, row in enumerate(TABLE8):
        assert [cur.counts[s][j] for s in range(9)] == list(row)


def test_any_budget_sums_exactly_and_keeps_shapes():
    for max_chunks, total in [(4, 4800), (32, 1000), (6, 777), (1, 10)]:
        cur = build_curriculum(max_chunks, total)
        assert cur.total == total
        assert cur.types == tuple(chunk_types(max_chunks))
        assert len(cur.order(0)) == total
        first = [row[0] for row in cur.counts]  # 1 x k examples: front-loaded
        assert first == sorted(first, reverse=True)
        if len(cur.types) > 2:
            last = [row[-1] for row in cur.counts]  # the longest contexts: back-loaded
            assert last == sorted(last)
        means = [m for m, row in zip(cur.stage_mean_chunks(), cur.counts) if sum(row)]  # non-empty stages
        assert all(a <= b + 1e-9 for a, b in itertools.pairwise(means))


def test_chunk_types_include_non_power_of_two_max():
    assert chunk_types(6) == [1, 2, 4, 6]
    assert chunk_types(1) == [1]


def test_order_is_seeded_stagewise_and_flat_order_is_not():
    cur = build_curriculum(8, 900)
    order = cur.order(3)
    assert order == cur.order(3) and order != cur.order(4)
    first_stage = sum(cur.counts[0])
    assert sorted(order[:first_stage]) == sorted(n for n, c in zip(cur.types, cur.counts[0]) for _ in range(c))
    flat = flat_order(8, 900, 3)
    assert sorted(flat) == sorted(order) and flat != order
