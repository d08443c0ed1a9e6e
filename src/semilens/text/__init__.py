"""The text path: knowledge base, PDF corpus, cleaning, ontology tagging, instructions."""
