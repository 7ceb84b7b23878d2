# Drawn by qtune-bench; re-run with `gnuplot scale_memory.gp` in this folder (scripts/plot_bench.sh does every plot).
set terminal pngcairo size 1000,620 enhanced font 'DejaVu Sans,10'
set output 'scale_memory.png'
set encoding utf8
set grid lc rgb '#dddddd'
set key noenhanced
set termoption noenhanced
$s0 << EOD
15.1917 715.104 30.3909 181.446 1 201.441
60.6684 1170.71 121.367 581.617 1 294.961
251.17 2264.38 502.411 1545.71 1 685.945
1100.05 5782.22 2200.28 5039.86 1 2524.5
EOD
$s1 << EOD
15.1917 707.838 26.2823 193.328 1.06549 261.415
60.6684 1086.62 64.1171 600.65 1.03272 396.87
251.17 1815.38 195.232 2060.5 1.33305 557.9
1100.05 4048.86 665.067 5847.38 1.16023 1222.92
EOD
$s2 << EOD
15.1917 709.214 26.9902 187.487 1.03329 297.472
60.6684 1070.52 66.945 750.209 1.28987 486.113
251.17 1843.28 206.942 1774.86 1.14825 587.112
1100.05 4300.95 713.302 6522.43 1.29417 1349.89
EOD
$s3 << EOD
15.1917 712.753 33.8344 208.398 1.14854 327.811
60.6684 1167.29 93.9064 711.3 1.22297 382.456
251.17 2096.6 317.672 1517.52 0.981758 667.632
1100.05 4585.69 1167.57 6299.4 1.24992 1695.83
EOD
set title 'Training peak RSS (solid), build peak (dotted) and base weights (dashed), 1 x 512 tokens per step'
set xlabel 'parameters (millions)'
set ylabel 'MB'
set key top left box opaque
set xrange [0:*]
set yrange [0:*]
plot $s0 using 1:2 with linespoints lt 1 pt 7 lw 2 title 'lora: training peak RSS', $s0 using 1:6 with lines lt 1 dt 3 lw 1.5 notitle, $s0 using 1:3 with lines lt 1 dt 2 lw 1.5 notitle, \
     $s1 using 1:2 with linespoints lt 2 pt 7 lw 2 title 'qlora nf4: training peak RSS', $s1 using 1:6 with lines lt 2 dt 3 lw 1.5 notitle, $s1 using 1:3 with lines lt 2 dt 2 lw 1.5 notitle, \
     $s2 using 1:2 with linespoints lt 3 pt 7 lw 2 title 'qlora hqq nbits=4: training peak RSS', $s2 using 1:6 with lines lt 3 dt 3 lw 1.5 notitle, $s2 using 1:3 with lines lt 3 dt 2 lw 1.5 notitle, \
     $s3 using 1:2 with linespoints lt 4 pt 7 lw 2 title 'qlora int8: training peak RSS', $s3 using 1:6 with lines lt 4 dt 3 lw 1.5 notitle, $s3 using 1:3 with lines lt 4 dt 2 lw 1.5 notitle
