"""What the test suites share, one module a piece: the live stack of real servers and the
product's services (``stack``), the export API as the tests drive it (``exports``), report paging
and the CSV's formula guard as a reader expects it (``reports``), export jobs inserted and read
back (``jobs``), the fault-injecting storage (``storage``), waiting (``waiting``), service
processes (``processes``), Kafka reads (``kafka``) and logging in with a browser (``browser``)."""
