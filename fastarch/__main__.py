from fastarch.cli import main

raise SystemExit(main())
