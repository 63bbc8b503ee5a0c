"""The pure core of bdn: digests, chunk planning, manifest records and validation.

Nothing here does I/O beyond bytes in, bytes out, and nothing here imports another bdn
package; every other package trusts and builds on these definitions.
"""
