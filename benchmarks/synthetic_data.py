"""Write the synthetic finance mixture (the benchmarks' data) or rewrite the sample files finsight ships.

    python benchmarks/synthetic_data.py --out DIR --rows 20000   # reddit_finance.jsonl + company_qa.jsonl
    python benchmarks/synthetic_data.py --samples                 # finsight/data/samples/*.jsonl

The generator lives in ``benchmarks/finbench/synthetic.py``; this file is its command line.
"""

from finbench.synthetic import main

if __name__ == "__main__":
    main()
