"""The one progress bar: silent off a terminal, counting and printing above itself on one."""

from mlxtune.progress import ProgressBar


def test_a_disabled_bar_draws_nothing_but_still_prints_lines(capsys):
    bar = ProgressBar("{task.description}", "bar", enabled=False)
    task = bar.add("work", 10)
    bar.update(task, completed=3)
    bar.advance(task)
    bar.print("a report line")
    bar.close()
    out = capsys.readouterr()
    assert (out.out, out.err) == ("a report line\n", "")


def test_an_enabled_bar_counts_and_prints_above_itself(capsys):
    bar = ProgressBar("{task.description}", "bar", "count", enabled=True, transient=False)
    task = bar.add("items", 4, completed=1)
    bar.advance(task)
    bar.advance(task)
    assert bar.bar.tasks[0].completed == 3
    bar.print("a note")
    bar.close()
    bar.close()  # closing twice is harmless (finally blocks may)
    out = capsys.readouterr()
    assert out.out == "" and "a note" in out.err and "3/4" in out.err
