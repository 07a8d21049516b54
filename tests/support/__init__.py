"""What the test suites share: report paging and the CSV's formula guard as a reader expects it."""
