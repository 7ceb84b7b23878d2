# Drawn by qtune-bench; re-run with `gnuplot ppl.gp` in this folder (scripts/plot_bench.sh does every plot).
set terminal pngcairo size 1000,560 enhanced font 'DejaVu Sans,10'
set output 'ppl.png'
set encoding utf8
set grid lc rgb '#dddddd'
set key noenhanced
set termoption noenhanced
$p << EOD
"none (fp32)" 4.03105 32
"nf4" 4.74566 4.13401
"nf4 dq=false" 4.74492 4.5
"hqq nbits=4" 4.56857 4.5
"hqq nbits=4 gs=128" 5.22061 4.25
"hqq nbits=3" 8.82402 3.5
"hqq nbits=2 gs=16" 95.3325 4
"hqq nbits=2" 2819.46 2.5
"hqq nbits=8" 4.03048 8.5
"int8" 4.03555 8.43337
"int8 gs=128" 4.03644 8.47285
EOD
set title 'Perplexity of stories260K on tinystories_val_head.txt'
set style data histograms
set style fill solid 0.85 border -1
set boxwidth 0.8
set xtics rotate by -30 left font ',9'
set ylabel 'perplexity (log)'
set logscale y
set bmargin 7
set rmargin 9
set key off
set yrange [1:*]
set xrange [-0.6:10.6]
plot $p using 2:xtic(sprintf('%s (%.2f b)', strcol(1), $3)) lc rgb '#4477aa', \
     $p using 0:2:(sprintf('%.3g', $2)) with labels offset 0,0.7 font ',8', \
     4.03105 with lines dt 2 lc rgb 'black'
